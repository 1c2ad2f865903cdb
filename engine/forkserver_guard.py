"""The fork server's own start-up step: the node's entry point names this module as the fork
server's preload, so importing it is its action, in the fork server only: die with the node."""

from engine.orphans import guard_fork_server

guard_fork_server()
