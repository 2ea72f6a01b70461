"""Synthetic text renders: text sources, line breaking, layout, rendering, the job."""
