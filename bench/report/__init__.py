"""report.html and summary.md from run folders."""
