"""The bottom layer: the error type every user-facing refusal uses, and the one file-safety
module (regular-file reads, hashing, checked outputs, atomic writes). Imports only the standard
library, so every other package may use it."""
