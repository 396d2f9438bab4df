#!/bin/sh
# taskfarm engines as a SLURM job array: one array task per engine.
# taskfarm fills in the placeholders (a dollar and a name in braces);
# a double dollar is the shell's own dollar.
#SBATCH --job-name=${job_name}
#SBATCH --array=${array}
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=1
#SBATCH --output=${log_dir}/slurm-%A_%a.out
${directives}

# The engine reads the furl from the profile's engine furl file, on the
# filesystem the nodes share; it is never passed in here.
exec ${engine_command} --property "batch_job='$${SLURM_ARRAY_JOB_ID}_$${SLURM_ARRAY_TASK_ID}'"
