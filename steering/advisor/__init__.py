"""The advisor: ranks the orientations to measure next, the closed-loop benchmark of
strategies and the bluesky-adaptive agent.
"""
