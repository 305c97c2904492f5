"""Client keys issued at run time through the admin API (issue 14)."""
