"""Masks: which patch tokens the student sees.

generate (random, block and reversed-block masks from a keyed generator), report (coverage
statistics shown as tables and heat maps, and written as JSON, CSV or PNG).

May import the ground floor only.
"""
