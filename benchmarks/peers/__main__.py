from benchmarks.peers.runner import main

main()
