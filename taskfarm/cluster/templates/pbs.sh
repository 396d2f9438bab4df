#!/bin/sh
# One taskfarm engine as a PBS Pro / Torque job (one job per engine).
# taskfarm fills in the placeholders (a dollar and a name in braces);
# a double dollar is the shell's own dollar.
#PBS -N ${job_name}
#PBS -j oe
#PBS -o ${log_dir}/
${directives}

# The engine reads the furl from the profile's engine furl file, on the
# filesystem the nodes share; it is never passed in here.
exec ${engine_command} --property "batch_job='$${PBS_JOBID}'"
