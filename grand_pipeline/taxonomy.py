"""The landmark taxonomy of the GLaMM paper (Tab. 7): 4 primary categories, 14 fine ones."""

from __future__ import annotations

LANDMARKS: dict[str, tuple[str, ...]] = {
    "Indoor scene": ("Living space", "Work space", "Public space", "Industrial space"),
    "Outdoor scene": ("Urban landscape", "Rural landscape", "Natural landscape"),
    "Transportation scene": ("Road", "Airport", "Train station", "Port and harbor"),
    "Sports and recreation scene": ("Sporting venue", "Recreational area", "Gym and fitness center"),
}


def fine_categories() -> list[tuple[str, str]]:
    """Every (category, fine_category) pair, in table order (14 pairs)."""
    return [(main, fine) for main, fines in LANDMARKS.items() for fine in fines]
