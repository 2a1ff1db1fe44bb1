"""HTTP routes, one module per resource; thin: parse, call a service, shape the answer."""
