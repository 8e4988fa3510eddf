"""One router per resource; handlers validate and delegate to ``worker``'s rule functions."""
