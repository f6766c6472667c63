"""Extension build helper for setup.py (placeholder until the C++ backend lands)."""


def extension(mode: str):
    return [], {}
