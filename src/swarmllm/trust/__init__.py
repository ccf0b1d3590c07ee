"""Who a peer is and which swarm it belongs to: identities, the swarm key, signed DHT records."""
