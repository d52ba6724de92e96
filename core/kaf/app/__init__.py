"""The user's jobs end to end: the `kaf` command line, its sub-commands, the workflow steps that every
front-end shares, and figures."""
