"""The trainer service: alignment data, the Stable Alignment loss, training, evaluation, job runners.

Importing the package is cheap (no torch): submodules pull in the heavy dependencies they need.
"""
