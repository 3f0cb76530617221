"""Shared pieces that methods compose: heads and classifiers, distillation, regularisers."""
