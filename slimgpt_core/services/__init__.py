"""Use cases over the engine, each load -> check -> run -> save -> measure, called by the command line and the studio."""
