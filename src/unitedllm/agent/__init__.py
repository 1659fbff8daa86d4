"""The device agent: enrols a machine with the platform and runs the roles it is told to start."""
