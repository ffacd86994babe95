import sys
sys.modules["escape_pth_ran"] = sys
