"""ccbridge command line and process orchestration (`ccbridge up`, `demo`, ...).

This package wires services together as separate processes; it holds no service logic.
"""
