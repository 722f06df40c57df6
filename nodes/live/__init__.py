"""Live mode: one long run streaming to a player on the node, taking prompts while it runs
(the loop, the page transport, the HTTP routes, the node)."""
