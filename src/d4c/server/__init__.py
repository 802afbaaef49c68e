"""The update server: stores images and deltas, plans the cheapest path for a client, merges it."""
