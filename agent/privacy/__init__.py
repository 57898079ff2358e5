"""The site's differential-privacy ledger, its budget enforcement and the membership-inference report."""
