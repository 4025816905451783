"""The login-node gateway: one endpoint in front of all of a user's running jobs (`slurmserve gateway`)."""
