"""The online half: the store (LMDB embedded, Redis production) and the service."""
