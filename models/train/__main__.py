from models.train import main

main()
