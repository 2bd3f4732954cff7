"""Pseudonymisation of smear metadata: keyed pseudonyms, age bands, dates; everything else dropped."""
