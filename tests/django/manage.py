#!/usr/bin/env python3
"""The Django project of pgferry's deploy test (tests/tests/e2e/deploys.rs):
its migrations are applied to the source in the middle of a sync."""
import os
import sys

if __name__ == "__main__":
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "ferryshop.settings")
    from django.core.management import execute_from_command_line

    execute_from_command_line(sys.argv)
