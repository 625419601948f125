"""Analysis of finished searches: lead-identification statistics, evaluation, export and labelling."""
