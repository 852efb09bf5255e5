"""Launching on Slurm: the job layout (nodes, ports, addresses), preflight checks and the
rollout-node process. The sbatch scripts in slurm/ drive these modules. Only the CPU demo's
one-time asset build imports torch, so the checks take seconds before any GPU time is spent."""
