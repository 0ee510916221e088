"""`harness launch`: runs the job under horovodrun or mpirun on one or several machines, restarts it from the
newest checkpoint, and names a failed rank and its machine in one line. Imports no torch."""
