"""The delta server (issue [7/8])."""
