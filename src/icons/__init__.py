"""icons: influence-consensus data selection (ICONS) for vision-language instruction tuning."""

__version__ = "0.1.0"
