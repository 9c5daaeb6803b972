"""Stemflow analyzer: musical facts with librosa on CPU cores."""
