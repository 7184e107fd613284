"""Pure, sans-I/O protocol and math code: no sockets, clocks, sleeps, logging or global RNG."""
