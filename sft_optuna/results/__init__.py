"""What a person takes away from a study: export (CSV, best recipe, figures), retrain with test accuracy,
plan (a budget preview), dashboard notes and the dashboard server. Nothing here runs inside a trial."""
