"""Recorded agent trajectories: loading, live and teacher-forced replay, baselines and reports."""
