"""Operations on canonical adapters: merge, convert, reparametrise (PiSSA/OLoRA/CorDA), fuse/unfuse, extract,
LoftQ."""
