"""Laid out as Qanot's bundled cloud_reporter is: no plugin.py, and this file imports the plugin
through Qanot's `plugins` package."""

from plugins.qanot_style.impl import QanotStylePlugin

__all__ = ["QanotStylePlugin"]
