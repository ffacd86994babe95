"""Stand-in for `qanot.plugins`."""
