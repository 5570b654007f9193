"""The ccbridge contract: subjects, event models, sealing, settings and bus wiring.

Every service imports from here and from nowhere else outside itself.
"""
