"""The HTTP front: routes, middleware, OpenAPI, the console's files."""
