"""Masked multi-stage consolidation fine-tune (Stage 4 of CPI-FT); see the issue tracker."""
