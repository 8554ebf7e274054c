"""What a person reads: the W&B run page (tracking), PNG figures (plots) and the saved W&B workspace view
(`python -m mrl.report.workspace`)."""
