from pvsfarm.cli import main

main()
