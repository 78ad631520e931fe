"""Scheduler policies: what runs next. ``base`` holds the settings and request state every
policy shares; one file per engine's rules."""
