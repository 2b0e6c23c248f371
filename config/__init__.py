"""Options: config/config.py holds every option with its default; loading.py reads a config module and --set overrides
and checks them."""
