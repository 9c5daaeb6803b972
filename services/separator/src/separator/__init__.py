"""Stemflow separator: demucs on a GPU (or CPUs), model kept warm."""
