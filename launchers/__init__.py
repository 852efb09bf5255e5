"""Job launchers built on optional tools (nemo-run); the plain sbatch scripts are in slurm/."""
