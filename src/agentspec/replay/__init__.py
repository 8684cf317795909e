"""Recorded agent trajectories and what is measured on them.

``trajectories`` reads the recorded formats into sessions of calls; ``simulate`` replays them
teacher-forced through the drafter (no model); ``live`` has the engine generate every call,
beside the comparison methods of ``baselines``; ``report`` holds what both measured, with its
tables and plot; ``demo`` is the quick-start demo and ``store_bench`` the session-store benchmark.
"""
