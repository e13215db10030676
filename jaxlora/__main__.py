from jaxlora.cli import main

main()
