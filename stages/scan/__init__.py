"""The SNR scan's building blocks: singular values, estimators, the SNR table, the resumable journal."""
