"""The rank's side: what runs inside each worker actor, one per rank."""
